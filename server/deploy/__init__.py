"""Deployment on Flower's engine: SuperLink launcher, certificates, SuperNode registration,
run submission and faster reply polling (see docs/deployment.md, "Deploying to edge
devices")."""
