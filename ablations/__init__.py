"""The ablation harness: experiments.yaml -> cells -> training runs -> MLflow -> paper-style reports.

Packages, in the order data flows (docs/architecture.md): util, config, data, train, tracking, run,
report, cli. A package imports only from those before it.
"""
