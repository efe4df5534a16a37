"""Using and judging trained models: prediction with a modality missing (`predict`), checks of a model folder
before prediction (`model_folder`), Dice with each modality removed (`robustness`), the HTML report of a model
folder (`report`), models trained on one budget (`equal_budget`, for `compare` and the demo) and their validation
curves and plateau rule (`curves`)."""
