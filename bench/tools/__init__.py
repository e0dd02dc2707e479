"""Questions beside the main job: plan (at scale, fake ranks), peers, speed, first-step latency, init speed."""
