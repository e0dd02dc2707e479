"""What is shown: results as data, the table and verdicts (summary), the plots, report.html."""
