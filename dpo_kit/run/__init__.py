"""Running the notebooks: `runner` (`dpo-kit run`, papermill into one run directory), `stage` (what each
stage notebook opens first and closes last) and `cli` (the `dpo-kit` command). Nothing else in the kit
imports from here. Import the modules by their full path."""
