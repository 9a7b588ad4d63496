# The MLflow tracking server, with the PostgreSQL driver its backend store needs (MLflow does not ship one).
# Pinned to the MLflow the project is developed against; the tuner's MLflow client comes from pyproject.toml.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_VERSION}" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir /mlartifacts \
    && chown mlflow:mlflow /mlartifacts
USER mlflow
