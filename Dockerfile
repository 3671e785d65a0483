# The image a Ray cluster runs (ray_cluster.yaml): Ray 2.60 with CUDA, plus granet, installed from
# the one dependency specification the README and CI use:
#   pip install -c constraints.txt -e ".[cluster]"
# constraints.txt pins torch==2.14.1 / torchvision==0.29.1; from PyPI on x86_64 that is the CUDA 13
# build (hosts need an NVIDIA driver >= 580). To use another CUDA build of the same version, install
# it from the PyTorch index before the RUN line below (e.g. pip install --index-url
# https://download.pytorch.org/whl/cu128 torch==2.14.1 torchvision==0.29.1): the constraints keep it.
# Build:  docker build -t granet:latest .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/granet
COPY --chown=ray:users pyproject.toml README.md constraints.txt ./
COPY --chown=ray:users granet ./granet
COPY --chown=ray:users studies ./studies
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users scripts ./scripts
RUN pip install --no-cache-dir -c constraints.txt -e ".[cluster]"
# Token authentication for every process of every node (ray_cluster.yaml exports it as well).
ENV RAY_AUTH_MODE=token
