-- GET the static answer of an NGINX of our own (the NGINX ceiling).
local dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(dir .. "common.lua")
