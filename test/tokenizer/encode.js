// Prints the token ids that the npm package gpt-3-encoder gives for a UTF-8 file, one per line.
// usage: node test/tokenizer/encode.js FILE
const path = require('path');
const fs = require('fs');
const { encode } = require(path.join(__dirname, '../../data/cache/gpt-3-encoder'));
for (const id of encode(fs.readFileSync(process.argv[2], 'utf8'))) console.log(id);
