from sdrctl.main import app

app(prog_name="sdrctl")
