module podtwin.invalid/ptbench

go 1.21
