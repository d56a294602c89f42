# tlsearch: one image for the launcher, the workers and optuna-dashboard (docker-compose.yml).
#
# torch comes from PyTorch's own index: the CUDA build by default (it runs on the CPU too, when the
# container has no GPU); build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu for a
# CPU-only image a fraction of the size.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TLSEARCH_CACHE=/cache

WORKDIR /app
# torch first and pinned, in its own layer: the rest changes far more often.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY tlsearch ./tlsearch
RUN pip install .
COPY studies ./studies

# Not root; /cache holds pretrained checkpoints (a volume shared by every container of the project).
RUN useradd --create-home --uid 1000 tlsearch && mkdir -p /cache && chown tlsearch /cache
USER tlsearch

ENTRYPOINT ["tlsearch"]
CMD ["--help"]
