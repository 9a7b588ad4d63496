# The MLflow tracking server, with the PostgreSQL driver its backend store needs (MLflow does not ship one).
# Pinned to the MLflow the project is developed against; the tuner's MLflow client comes from pyproject.toml.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
# psycopg 3: SQLAlchemy 2.1, which this MLflow installs, maps postgresql:// URIs to it (psycopg2 is not used).
ARG PSYCOPG_VERSION=3.3.9

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg[binary]==${PSYCOPG_VERSION}" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir /mlartifacts \
    && chown mlflow:mlflow /mlartifacts
USER mlflow
