# The control plane: CPU only. torch comes from the CPU wheel index (the package depends on it for the CPU
# worker; the control plane itself never imports it).
FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu .
ENV PAGEDSERVE_LOG_FORMAT=json
EXPOSE 50051 9400
ENTRYPOINT ["pagedserve"]
