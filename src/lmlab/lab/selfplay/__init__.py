"""Self-play lab: an Absolute Zero miniature on a program DSL (`azr`) and self-play RL for text models (`text`)."""
