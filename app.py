"""The Gradio app (vanilla vs Stein side by side) arrives with the app issue; until then, the CLI.

    python -m steindiff sample --model gmm-ring --solver dpmpp_2m --nfe 5 --stein --out result.json
"""

import sys

if __name__ == "__main__":
    sys.exit(
        "steindiff: the browser app is not built yet. Use the CLI for now:\n"
        "  python -m steindiff sample --model gmm-ring --solver dpmpp_2m --nfe 5 --stein --out result.json"
    )
