# Sourced by bootstrap.sh: offline assets (real pretrained weights and real images).
# (filled in by the data/model work; see python/vitq/data.py and python/vitq/models.py)
true
