#!/usr/bin/env bash
# Bone Soups at 7B (Xie et al. 2025), helpful against harmless: a reward model per objective on
# PKU-SafeRLHF, two backbones on mixed rewards (beta 0.7), the Rewarded Soups experts as the
# baseline, both fronts over a grid of preferences scored by both reward models, then the family
# served with a merge per request. Needs the SALSA recipe's SFT-0 (salsa-7b/submit.sh step 1).
#   export RAY_ADDRESS=http://127.0.0.1:8265 ; bash clusters/recipes/bone-soup-7b/submit.sh
#   DRY_RUN=1 bash clusters/recipes/bone-soup-7b/submit.sh   # print the jobs only
source "$(dirname "$0")/../submit-lib.sh"
R=clusters/recipes/bone-soup-7b
OUT=/mnt/shared/rayalign/bone-soup-7b

# 1. helpful and harmless pairs, and the prompts, from PKU-SafeRLHF (CPU only)
submit bone-7b-data -- python -m rayalign.cli convert pku-saferlhf $OUT/data --source PKU-Alignment/PKU-SafeRLHF

# 2. one reward model per objective, each a Ray Train run of 16 GPU workers over two nodes
submit bone-7b-rm-helpful -- python -m rayalign.cli rm --config $R/rm.yaml
submit bone-7b-rm-harmless -- python -m rayalign.cli rm --config $R/rm.yaml data.source=$OUT/data/harmless.jsonl \
  output=$OUT/rm-harmless

# 3. Bone Soup backbones on h = B r (beta 0.7), and the Rewarded Soups experts on r_i alone; 16 GPUs each
submit bone-7b-backbone-0 -- python -m rayalign.cli train ppo --config $R/backbone.yaml
submit bone-7b-backbone-1 -- python -m rayalign.cli train ppo --config $R/backbone.yaml \
  "reward.weights=[0.3,0.7]" output=$OUT/backbone-1
submit bone-7b-expert-helpful -- python -m rayalign.cli train ppo --config $R/backbone.yaml \
  "reward.weights=[1.0,0.0]" output=$OUT/expert-helpful
submit bone-7b-expert-harmless -- python -m rayalign.cli train ppo --config $R/backbone.yaml \
  "reward.weights=[0.0,1.0]" output=$OUT/expert-harmless critic=$OUT/rm-harmless/model

# 4. both fronts over mu = (m, 1 - m): Bone (lambda = B^-1 mu) and Rewarded (theta = sum mu_i theta_i),
#    every merged model scored by both reward models on 500 prompts
MODELS=()
for m in 0.0 0.25 0.5 0.75 1.0; do
  n=$(python3 -c "print(round(1 - $m, 2))")
  submit "bone-7b-merge-bone-$m" -- python -m rayalign.cli merge $R/merge.yaml $OUT/fronts/bone-$m "mu=[$m,$n]" --quiet
  submit "bone-7b-merge-rewarded-$m" -- python -m rayalign.cli merge $R/merge-rewarded.yaml $OUT/fronts/rewarded-$m \
    "models=[{model: $OUT/expert-helpful/policy, weight: $m}, {model: $OUT/expert-harmless/policy, weight: $n}]" --quiet
  MODELS+=("$OUT/fronts/bone-$m" "$OUT/fronts/rewarded-$m")
done
submit bone-7b-eval --entrypoint-num-gpus 1 -- python -m rayalign.cli eval \
  "models=[$(IFS=,; echo "${MODELS[*]}")]" prompts.source=$OUT/data/prompts.jsonl prompts.limit=500 \
  reward.kind=model "reward.model=[$OUT/rm-helpful/model,$OUT/rm-harmless/model]" "reward.weights=[0.5,0.5]" \
  samples_per_prompt=2 max_new_tokens=512

# 5. serve the family (a long-running job; `ray job stop bone-7b-serve` ends it). For a managed,
#    self-healing deployment use clusters/kuberay/rayservice.yaml instead.
submit bone-7b-serve --no-wait -- python -m rayalign.cli serve --config $R/serve.yaml
