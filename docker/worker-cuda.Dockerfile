# CUDA worker: the same worker; torch picks the GPU (ISTREAM_DEVICE=auto) and trains with bf16 autocast.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DEBIAN_FRONTEND=noninteractive

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY models ./models
COPY storage ./storage
RUN pip install .

RUN useradd --create-home istream
USER istream
EXPOSE 9108
ENTRYPOINT ["istream"]
CMD ["worker"]
