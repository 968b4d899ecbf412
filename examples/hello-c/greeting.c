#include "greeting.h"

const char *greeting(void) { return "Hello from a program weft built."; }
