"""Deployment files for hubnode, and `deploy.cluster`: the local cluster of `make cluster`."""
