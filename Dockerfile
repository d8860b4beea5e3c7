# One image for every service of the production stack; docker-compose.yml picks the `algo` subcommand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged uid: the services need no root, and volumes get predictable ownership.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin algo

WORKDIR /opt/algo-src
# Only what the package build needs (see .dockerignore); tests and local state stay out of the image.
COPY pyproject.toml README.md ./
COPY api ./api
COPY benchmarks ./benchmarks
COPY cli ./cli
COPY connectors ./connectors
COPY core ./core
COPY manager ./manager
COPY schemas ./schemas
COPY storage ./storage
COPY streams ./streams
RUN pip install . && rm -rf /opt/algo-src

USER algo
WORKDIR /home/algo
ENTRYPOINT ["algo"]
CMD ["--help"]
