module rewindclient

go 1.19
