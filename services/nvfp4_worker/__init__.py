"""The quantization worker: takes jobs from Redis and runs ModelOpt PTQ on them."""
