#!/usr/bin/env bash
# SALSA at 7B (Chegini et al. 2024), as in the paper: two SFT models of Llama-2-7B on UltraChat-200k,
# their soup as the KL reference, a reward model on UltraFeedback, PPO against SALSA.
# From the repository root, against a cluster of clusters/launcher/*.yaml or KubeRay:
#   export RAY_ADDRESS=http://127.0.0.1:8265      # the head's dashboard (`ray dashboard` forwards it)
#   bash clusters/recipes/salsa-7b/submit.sh       # each step waits for the previous one
#   DRY_RUN=1 bash clusters/recipes/salsa-7b/submit.sh   # print the jobs only
# A failed step continues from its last saved state: rerun its command with --resume.
source "$(dirname "$0")/../submit-lib.sh"
R=clusters/recipes/salsa-7b
OUT=/mnt/shared/rayalign/salsa-7b

# 1. two SFT seeds, each a Ray Train run of 16 GPU workers over two nodes (DeepSpeed ZeRO-3); the
#    driver holds no GPU, the workers take theirs
submit salsa-7b-sft -- python -m rayalign.cli sft --config $R/sft.yaml

# 2. the reward model from SFT-0 on UltraFeedback-binarized, the same way
submit salsa-7b-rm -- python -m rayalign.cli rm --config $R/rm.yaml

# 3. PPO: pi_ref = SFT-0. 16 GPUs: 8 learner ranks, 4 vLLM engines, 2 reference, 2 reward workers
submit salsa-7b-ppo -- python -m rayalign.cli train ppo --config $R/ppo.yaml

# 4. SALSA: the same run with pi_ref = the uniform soup of the two SFT seeds (merged on load by the
#    merge engine) and a smaller KL coefficient; the KL-hack monitor stops a length collapse
submit salsa-7b-salsa -- python -m rayalign.cli train salsa --config $R/ppo.yaml output=$OUT/salsa \
  "reference.models=[$OUT/sft/sft-0,$OUT/sft/sft-1]" algo.beta=0.02 monitor.stop_on_collapse=true

# 5. PPO against SALSA: 2 samples on 1,000 UltraFeedback test prompts, scored by the reward model
submit salsa-7b-eval --entrypoint-num-gpus 1 -- \
  python -m rayalign.cli eval "models=[$OUT/ppo/policy,$OUT/salsa/policy]" \
  prompts.source=HuggingFaceH4/ultrafeedback_binarized prompts.split=test_prefs prompts.limit=1000 \
  reward.kind=model reward.model=$OUT/rm/model samples_per_prompt=2 max_new_tokens=512
