from nvfp4_admin.cli import main

main()
