# The image a Ray cluster runs (ray_cluster.yaml): Ray 2.60 with CUDA, plus granet.
# Build:  docker build -t granet:latest .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/granet
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users granet ./granet
COPY --chown=ray:users studies ./studies
COPY --chown=ray:users configs ./configs
# ray[default] for the dashboard and the job API on the head node; psycopg for a Postgres
# Optuna/MLflow store on a cluster.
RUN pip install --no-cache-dir -e . "ray[default]==2.60.*" "psycopg[binary]>=3.1"
ENV RAY_AUTH_MODE=token
