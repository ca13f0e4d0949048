# A stand-in for the redis image where no registry is reachable (CI, air-gapped hosts):
# Debian's redis-server on the local Debian base (scripts/image-base.sh), with the user
# docker-compose.yml expects (redis, uid/gid 999, as in the official image). Built by
# scripts/build-images.sh only when the engine cannot pull; set NVFP4_REDIS_IMAGE to it.
ARG BASE_IMAGE=localhost/nvfp4-base:bookworm-py311-v1
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 redis \
    && useradd --system --uid 999 --gid 999 --home-dir /data --shell /usr/sbin/nologin redis \
    && apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--dir", "/data"]
