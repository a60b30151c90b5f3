# syntax=docker/dockerfile:1
# ConvForge serving image: the Bento that `python -m pipelines.stages.package` wrote to
# artifacts/bento/convforge.bento, served by `python -m services.serve` on port 3000 as a non-root user.
# One build, two variants: TORCH_VARIANT picks the PyTorch wheel index (cpu, or a CUDA build such as
# cu130) and SERVE_GROUP the dependency group (serve-cuda: onnxruntime-gpu in place of onnxruntime):
#   docker build -t convforge .                                        # CPU (default)
#   docker build --build-arg TORCH_VARIANT=cu130 --build-arg SERVE_GROUP=serve-cuda -t convforge:cuda .
#   docker run -p 3000:3000 convforge                                  # the cuda image: add --gpus all
# The cuda image serves on the GPU (serve.device: auto finds it; /version says `device: cuda`). Its
# CUDA runtime, cuBLAS and cuDNN are the nvidia-* wheels the CUDA torch build depends on, which
# ONNX Runtime's CUDA provider loads too; `--gpus all` brings the driver. So both variants build on
# the same Python base image: NVIDIA's nvidia/cuda images carry no Python to run the service with.
# The image holds pyproject.toml's serving dependency group only (`--group serve`: no MLflow, Ray,
# DVC, Optuna), then the project with --no-deps. Every command below is also run by the tests:
# tests/integration/test_slim_serving.py the venv and pip steps (in a venv built from the serve group
# alone, from this machine's package index), tests/integration/test_service.py the import, serve and
# healthcheck commands.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG SERVE_GROUP=serve
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipelines pipelines
COPY models models
COPY services services
# Dependency groups (PEP 735) need pip 25.1 or later.
RUN pip install --upgrade "pip>=25.1" && \
    pip install --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple --group "$SERVE_GROUP" && \
    pip install --no-deps .

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 convforge
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=convforge pyproject.toml params.yaml ./
COPY --chown=convforge pipelines pipelines
COPY --chown=convforge models models
COPY --chown=convforge services services
COPY --chown=convforge artifacts/bento/convforge.bento /app/convforge.bento
USER convforge
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BENTOML_HOME=/home/convforge/bentoml \
    BENTOML_DO_NOT_TRACK=True \
    CONVFORGE_BENTO=/app/convforge.bento \
    CONVFORGE_HOST=0.0.0.0 \
    CONVFORGE_PORT=3000
RUN python -m services.serve --import-only
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 CMD ["python", "-m", "services.serve", "--check"]
CMD ["python", "-m", "services.serve"]
