# syntax=docker/dockerfile:1.7
#
# MLflow tracking server + model registry for gaussian-ad: PostgreSQL backend store,
# artifacts proxied (--serve-artifacts) to an S3 bucket on MinIO. Options that carry
# credentials come from the environment (MLFLOW_BACKEND_STORE_URI, AWS_*), not the
# command line; see infra/docker-compose.yml.
#
#   docker build -f docker/mlflow.Dockerfile -t gaussian-ad/mlflow:3.17.2 .
FROM python:3.11.13-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true

RUN pip install \
      mlflow==3.17.2 \
      psycopg2-binary==2.9.13 \
      boto3==1.44.8 \
 && pip check

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
