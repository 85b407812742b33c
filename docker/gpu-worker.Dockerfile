# A GPU worker: CUDA torch and CuPy; the kernels compile at run time with NVRTC.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir ".[gpu]"
EXPOSE 50061
ENTRYPOINT ["pagedserve"]
