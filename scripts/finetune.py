#!/usr/bin/env python
"""Private fine-tuning from a YAML config; see lap2_hf/finetune.py and configs/.

    accelerate launch scripts/finetune.py --config configs/sst2_eps054.yaml
    python scripts/finetune.py --config configs/quickstart.yaml --privacy.mechanism gaussian
"""

import sys

from lap2_hf.finetune import main

if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError) as exc:  # configuration errors: one clear line, no traceback
        print(f"finetune.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
