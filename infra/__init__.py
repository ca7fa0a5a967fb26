"""The local stack (S3 server, MLflow server, Ray head) as real processes; see infra/README.md."""
