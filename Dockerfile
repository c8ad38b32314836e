# The GPU worker image for cluster.yaml: Ray's GPU image with this project's dependencies baked in,
# so a new spot worker pulls layers instead of installing CUDA torch on paid GPU time. From the
# repository root:
#
#   docker build -t YOUR-REGISTRY/marsseg-worker:2.60.0 .
#   docker push YOUR-REGISTRY/marsseg-worker:2.60.0
#
# then set `worker_image:` in cluster.yaml to that tag. The project's own code is not in the image:
# `ray up` syncs it to every node and the worker setup installs it (`pip install -e`, seconds).
# Rebuild after pyproject.toml's dependencies or constraints/cluster.txt change.
#
# The tag's Ray version and Python must be the head's: the version pinned in
# constraints/cluster.txt (tests/test_cluster.py checks), Python 3.11 like cluster.yaml's images.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# PyPI's torch for Linux x86_64 is a CUDA build (2.13.0: CUDA 13.0) that brings its own CUDA
# libraries as pip packages, so it needs only the host's NVIDIA driver (CUDA 13.0: 580 or newer),
# whatever CUDA the image has. For an older driver, use a pytorch.org index of another CUDA, e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (it must hold the pinned
# torch). Its own layer: the biggest, and it changes least.
ARG TORCH_INDEX_URL=https://pypi.org/simple
COPY constraints/cluster.txt /tmp/marsseg/constraints.txt
RUN pip install --no-cache-dir -c /tmp/marsseg/constraints.txt --index-url "${TORCH_INDEX_URL}" torch

# Everything else pyproject.toml's [project] dependencies list, read from the file itself (the
# project is not installed here), at the versions of constraints/cluster.txt.
COPY pyproject.toml /tmp/marsseg/pyproject.toml
RUN python -c "import tomllib; project = tomllib.load(open('/tmp/marsseg/pyproject.toml', 'rb'))['project']; print(*project['dependencies'], sep=chr(10))" > /tmp/marsseg-requirements.txt \
    && pip install --no-cache-dir -c /tmp/marsseg/constraints.txt -r /tmp/marsseg-requirements.txt \
    && rm /tmp/marsseg-requirements.txt
