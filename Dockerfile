# The cis_bot image of the compose dev cluster (docker-compose.yml): the package on a slim
# Python, run as a user without privileges. Agents other than the shell (Claude Code, aider,
# ...) are not in it: build an image FROM this one that installs them, if the workers need them.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The uid the compose file gives Synapse too (UID/GID), so each can read the registrations the
# other writes (they are 0600, as every secret cis writes).
RUN groupadd --gid 1000 cis \
    && useradd --uid 1000 --gid cis --create-home --shell /bin/bash cis \
    && mkdir /cluster /state \
    && chown cis:cis /cluster /state

WORKDIR /src
COPY pyproject.toml README.md ./
COPY cis_bot ./cis_bot
RUN pip install . && rm -rf /src

USER cis
WORKDIR /home/cis
CMD ["cis", "--help"]
