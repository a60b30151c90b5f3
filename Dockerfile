# syntax=docker/dockerfile:1
# ConvForge serving image: the Bento that `python -m pipelines.stages.package` wrote to
# artifacts/bento/convforge.bento, served by `python -m services.serve` on port 3000.
#   docker build -t convforge .                                   # CPU torch
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t convforge:cuda .
#   docker run -p 3000:3000 convforge
# Every command below is also run by tests/integration/test_service.py (the serve, import
# and healthcheck commands) or by CI's `make setup` (the same pyproject install).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipelines pipelines
COPY models models
COPY services services
RUN pip install --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple .

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
