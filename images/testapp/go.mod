module podtwin.invalid/udpsend

go 1.21
