"""Using and judging trained models: prediction with a modality missing (`predict`), checks of a model folder
before prediction (`model_folder`), Dice with each modality removed (`robustness`), the HTML report of a model
folder (`report`), and models trained to a plateau on one budget (`compare`)."""
