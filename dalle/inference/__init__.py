"""From prompts to ranked pictures: sampling, CLIP scoring, search, the pipeline. No training code."""
