/*
 * Send one image to an `edgederm serve` (or Triton) server and print its answer.
 *
 *   cc edgederm_client.c -lcurl -o edgederm_client
 *   ./edgederm_client http://127.0.0.1:8000 MODEL lesion.jpg
 *
 * The request is the KServe v2 protocol's binary tensor extension: a JSON header that
 * declares one BYTES input, "dermoscopy", of binary_data_size bytes, followed by that
 * input's data (a 4-byte little-endian length, then the encoded image exactly as the
 * camera wrote it). The header's size goes in Inference-Header-Content-Length. The
 * outputs are asked for as JSON, so the answer is plain JSON for the firmware's own
 * parser: label, probabilities (with probability_names), needs_review, review_reasons.
 *
 * Set EDGEDERM_SERVE_TOKEN when the server requires a bearer token.
 * Exit status: 0 on HTTP 200, 1 on a protocol error (message on stderr), 2 on bad usage
 * or a transport failure.
 */
#include <curl/curl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *data;
    size_t size;
} buffer_t;

static size_t append(void *chunk, size_t size, size_t count, void *user) {
    buffer_t *buffer = (buffer_t *)user;
    size_t n = size * count;
    char *grown = realloc(buffer->data, buffer->size + n + 1);
    if (grown == NULL) return 0; /* makes curl fail the transfer */
    buffer->data = grown;
    memcpy(buffer->data + buffer->size, chunk, n);
    buffer->size += n;
    buffer->data[buffer->size] = '\0';
    return n;
}

static int read_file(const char *path, buffer_t *out) {
    FILE *file = fopen(path, "rb");
    if (file == NULL) return -1;
    if (fseek(file, 0, SEEK_END) != 0) { fclose(file); return -1; }
    long size = ftell(file);
    if (size < 0 || size > 0x7fffffffL || fseek(file, 0, SEEK_SET) != 0) { fclose(file); return -1; }
    out->data = malloc((size_t)size + 1);
    out->size = (size_t)size;
    if (out->data == NULL || fread(out->data, 1, out->size, file) != out->size) { fclose(file); return -1; }
    fclose(file);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SERVER_URL MODEL IMAGE\n", argv[0]);
        return 2;
    }
    const char *server = argv[1], *model = argv[2], *image_path = argv[3];
    buffer_t image = {0}, answer = {0};
    if (read_file(image_path, &image) != 0) {
        fprintf(stderr, "cannot read image %s\n", image_path);
        return 2;
    }

    char header[1024];
    int header_size = snprintf(header, sizeof header,
        "{\"inputs\":[{\"name\":\"dermoscopy\",\"datatype\":\"BYTES\",\"shape\":[1],"
        "\"parameters\":{\"binary_data_size\":%zu}}],"
        "\"outputs\":[{\"name\":\"label\"},{\"name\":\"probabilities\"},{\"name\":\"probability_names\"},"
        "{\"name\":\"needs_review\"},{\"name\":\"review_reasons\"}]}",
        image.size + 4);
    if (header_size < 0 || (size_t)header_size >= sizeof header) return 2;

    size_t body_size = (size_t)header_size + 4 + image.size;
    unsigned char *body = malloc(body_size);
    if (body == NULL) return 2;
    memcpy(body, header, (size_t)header_size);
    uint32_t length = (uint32_t)image.size;
    unsigned char *prefix = body + header_size;
    prefix[0] = length & 0xff; prefix[1] = (length >> 8) & 0xff;  /* little-endian whatever the CPU */
    prefix[2] = (length >> 16) & 0xff; prefix[3] = (length >> 24) & 0xff;
    memcpy(prefix + 4, image.data, image.size);

    char url[2048], length_header[96], auth[1024];
    snprintf(url, sizeof url, "%s/v2/models/%s/infer", server, model);
    snprintf(length_header, sizeof length_header, "Inference-Header-Content-Length: %d", header_size);

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return 2;
    CURL *curl = curl_easy_init();
    if (curl == NULL) return 2;
    struct curl_slist *headers = NULL;
    headers = curl_slist_append(headers, "Content-Type: application/octet-stream");
    headers = curl_slist_append(headers, length_header);
    const char *token = getenv("EDGEDERM_SERVE_TOKEN");
    if (token != NULL && token[0] != '\0') {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", token);
        headers = curl_slist_append(headers, auth);
    }
    curl_easy_setopt(curl, CURLOPT_URL, url);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_size);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, append);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, &answer);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT, 60L);  /* never wait forever on a dead link */

    CURLcode code = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    int exit_code;
    if (code != CURLE_OK) {
        fprintf(stderr, "request to %s failed: %s\n", url, curl_easy_strerror(code));
        exit_code = 2;
    } else if (status != 200) {
        fprintf(stderr, "HTTP %ld: %s\n", status, answer.data ? answer.data : "");
        exit_code = 1;
    } else {
        printf("%s\n", answer.data ? answer.data : "");
        exit_code = 0;
    }
    curl_slist_free_all(headers);
    curl_easy_cleanup(curl);
    curl_global_cleanup();
    free(body);
    free(image.data);
    free(answer.data);
    return exit_code;
}
