#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run the main job on the embedded default.
# Today that is the data stage: a real labelled image set (scikit-learn's digits) as an ImageNet-style
# tree -> WebDataset shards + manifest -> inspect. Later stages (teacher cache, training) extend it.
source "$(dirname "$0")/bootstrap.sh"
out=${DEMO_DIR:-demo-data}
rm -rf "$out/images"
pipeline demo-tree --dst "$out/images"
for split in train val; do
  pipeline build-shards --src "$out/images" --split "$split" --dst "$out/shards" --shard-size 1MB
  pipeline inspect "$out/shards" --split "$split"
done
echo "shards, manifests and reports are in $out/shards"
