from sdrctl.main import app

# The guard matters: media worker processes are spawned, and import the main module again.
if __name__ == "__main__":
    app(prog_name="sdrctl")
