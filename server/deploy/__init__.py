"""Deployment on Flower's engine: SuperLink launcher, certificates, SuperNode registration,
run submission and faster reply polling (see the README section "Deploying to edge
devices")."""
