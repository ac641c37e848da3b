"""Small runs of each measuring command on the tiny model, shared by the tests that drive
every command (test_capabilities.py, test_signals.py): long enough (one thread) to be
stopped mid-way. A repeated option's last value wins, so a test shortens them by appending."""

METHODS = ["-m", "baseline", "-m", "streaming_4_48", "-m", "h2o_4_6_48"]
COMMANDS = {
    "sweep": ["sweep", "--lengths", "128,256,384,512,640,768", "--chunk", "32", "--decode-steps", "4"],
    "ppl": ["ppl", "--tokens", "768", "--buckets", "128,256,384,512,640", "--chunk", "1"],
    "needle": ["needle", "--lengths", "128,192,256,320", "--depths", "0,50,100", "--needles", "2",
               "--max-new-tokens", "3", "--chunk", "32"],
    "batch": ["batch", "--length", "128", "--batch-sizes", "1,2,3,4,5,6", "--chunk", "32", "--decode-steps", "4"],
}
