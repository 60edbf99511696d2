module podtwin.local/pause

go 1.22
