// The wrapper scripts/gen-proto.js gives pbjs: an ES module that imports
// protobufjs/minimal.js as the CommonJS module it is. (pbjs's own es6
// wrapper imports it as a namespace, whose members Node cannot see.)
import $protobuf from $DEPENDENCY;

$OUTPUT;

export { $root as default };
