# mkat: a small image for amd64, arm64 and armv7 (Raspberry Pi). Every dependency is pure Python.
#   docker build -t mkat .
#   docker run -d -p 8080:8080 -v mkat-data:/data --name mkat mkat
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MKAT_HOST=0.0.0.0 \
    MKAT_PORT=8080 \
    MKAT_DATABASE_PATH=/data/mkat.db

WORKDIR /app
COPY pyproject.toml README.md mkat.py schema.sql ./
COPY mkat_static ./mkat_static
RUN pip install --no-cache-dir --no-compile . \
    && mkdir /data \
    && chown 10001:10001 /data

USER 10001
VOLUME ["/data"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MKAT_PORT', '8080'), timeout=4)"]

CMD ["python", "mkat.py"]
