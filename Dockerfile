# hepaflow in one image: the binary, libtorch from the PyTorch 2.13.0 wheel, the demo model,
# the schedules. TORCH_SET=cpu (default) carries the small CPU set; TORCH_SET=cuda the full
# wheel with its CUDA libraries, for GPU workers (the build links torch_cuda when they exist).
FROM rust:1.95-bookworm AS build
ARG TORCH_SET=cpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/hepaflow
RUN python3 -m venv .venv-torch \
    && if [ "$TORCH_SET" = cuda ]; then \
         .venv-torch/bin/pip install --no-cache-dir torch==2.13.0; \
       else \
         .venv-torch/bin/pip install --no-cache-dir --no-deps \
           torch==2.13.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85; \
       fi
COPY . .
ENV LIBTORCH=/opt/hepaflow/.venv-torch/lib/python3.11/site-packages/torch
RUN cargo build --release --locked && cp target/release/hepaflow /usr/local/bin/ && rm -rf target

FROM debian:bookworm-slim
# libtorch stays at the path the binary's rpath names.
COPY --from=build /opt/hepaflow/.venv-torch/lib/python3.11/site-packages /opt/hepaflow/.venv-torch/lib/python3.11/site-packages
COPY --from=build /usr/local/bin/hepaflow /usr/local/bin/hepaflow
COPY models /opt/hepaflow/models
COPY jobs /opt/hepaflow/jobs
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 postgresql-15 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/hepaflow hepaflow && mkdir -p /var/lib/hepaflow \
    && chown hepaflow /var/lib/hepaflow
USER hepaflow
WORKDIR /var/lib/hepaflow
EXPOSE 8080
ENV HEPAFLOW_DATA_DIR=/var/lib/hepaflow HEPAFLOW_JOBS_DIR=/opt/hepaflow/jobs \
    HEPAFLOW_DEFAULT_MODEL=/opt/hepaflow/models/demo
ENTRYPOINT ["hepaflow"]
CMD ["--help"]
