// Requantise a GGUF with llama.cpp's own quantizer (llama_model_quantize, what the
// llama-quantize tool calls), built against libllama alone so that fetching the test
// files does not compile llama.cpp's tools and common library.
//   llama_quantize IN.gguf OUT.gguf FTYPE   (FTYPE: llama.h's enum llama_ftype)
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s IN.gguf OUT.gguf FTYPE\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    struct llama_model_quantize_params params = llama_model_quantize_default_params();
    params.ftype = (enum llama_ftype)atoi(argv[3]);
    uint32_t rc = llama_model_quantize(argv[1], argv[2], &params);
    llama_backend_free();
    if (rc != 0) {
        fprintf(stderr, "llama_model_quantize failed (%u)\n", rc);
        return 1;
    }
    return 0;
}
