# syntax=docker/dockerfile:1
# The omni service image; the demo sandbox and load generator run from the same image.
# Pinned to an exact Python patch release on Debian 12 (bookworm): rebuilds are reproducible
# and a bump is a reviewed one-line change.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/omni

# Dependencies first, so a code change does not reinstall them. Every wheel needed
# (psycopg2-binary, psutil) ships manylinux builds: no compiler in the image.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# A fixed, unprivileged uid/gid; nothing in the image is writable by it except /tmp
# (gunicorn's worker heartbeat files and PROMETHEUS_MULTIPROC_DIR live there).
RUN groupadd --system --gid 10001 omni \
    && useradd --system --uid 10001 --gid omni --home-dir /srv/omni --shell /usr/sbin/nologin omni

COPY app/ app/
COPY sql/ sql/
COPY demo/ demo/

USER 10001:10001
EXPOSE 8882

# /health answers 200 only while the database answers (SPEC 4.1). urllib keeps the image
# free of curl; the port follows AUTOMAGIK_OMNI_PORT like the server does.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request; port=os.environ.get('AUTOMAGIK_OMNI_PORT','8882'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status == 200 else 1)"]

# Migrations first (idempotent, safe when several replicas start at once), then gunicorn
# replaces the shell so it receives SIGTERM directly and shuts down gracefully.
CMD ["sh", "-c", "python -m app migrate && exec gunicorn -c app/gunicorn.conf.py 'app:create_app()'"]
