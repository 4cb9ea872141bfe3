#!/usr/bin/env bash
# Fetch the offline test data (the same files as the workplace's shared/data, see its DATA.md)
# from the pinned public repositories they were taken from, and check their sha256.
# Usage: fetch_offline_data.sh DEST_DIR
set -euo pipefail
dest=${1:?usage: fetch_offline_data.sh DEST_DIR}
raw=https://raw.githubusercontent.com

fetch() {  # fetch REPO@COMMIT/PATH TARGET [SHA256]
  local source=$1 target=$2 sha=${3:-}
  mkdir -p "$(dirname "$dest/$target")"
  curl -fsSL --retry 3 "$raw/${source/@//}" -o "$dest/$target.part"
  if [ -n "$sha" ]; then echo "$sha  $dest/$target.part" | sha256sum -c --quiet -; fi
  mv "$dest/$target.part" "$dest/$target"
}

wt=pytorch/examples@77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/wikitext-2
fetch "$wt/valid.txt" wikitext-2/valid.txt f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8
fetch "$wt/test.txt" wikitext-2/test.txt d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0

glue=AnthonyWuZYW/Fine-Tuning-BERT-LoRA@7a8ae6250bd0e4ffd8506ab7e396824c1ef44afb/glue_data
for task in CoLA SST-2 STS-B RTE WNLI; do
  for split in train dev; do fetch "$glue/$task/$split.tsv" "glue/$task/$split.tsv"; done
done
fetch "$glue/QNLI/dev.tsv" glue/QNLI/dev.tsv ac19409dcb04631eaaa094bdebdcf621086bc352503dfb6a1a648b614986f4fd
mrpc=Nstats/my_bert@733d79335044b1b7eabb5b47a0eae0cd621dadc0/data/MRPC
fetch "$mrpc/train.tsv" glue/MRPC/train.tsv 122becc469405bc16f9defcb8715d2a4b7ce600e9d9381e6dc42bfdd1494c51d
fetch "$mrpc/dev.tsv" glue/MRPC/dev.tsv 81c8a1a9e1dfe461dd2c1a4f98f43fe18bece44d2bf9e3d0b245b88e5aa5eaf7

mnist=lijie2020/vae@6aa58aba724f46dba967fc7058945941d171d433/data/MNIST/MNIST/raw
fetch "$mnist/t10k-images-idx3-ubyte.gz" mnist/t10k-images-idx3-ubyte.gz 8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6
fetch "$mnist/t10k-labels-idx1-ubyte.gz" mnist/t10k-labels-idx1-ubyte.gz f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6

fetch karpathy/char-rnn@6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt tinyshakespeare/input.txt
