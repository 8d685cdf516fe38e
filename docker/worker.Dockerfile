# CPU worker: `istream worker` against the Kafka and Postgres named by ISTREAM_* settings.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app
# The CPU build of torch keeps the image small; the pin matches pyproject.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
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
