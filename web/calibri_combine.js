// CalibriCombine has a weight and a prompt widget for each of its four calibration inputs. The ones of an
// unconnected input do nothing, yet drawn they read as settings that matter, so they are hidden until their
// input is connected. Hiding keeps the widgets (and so the order of widgets_values in saved workflows); it only
// leaves them out of drawing and of the node's size. Both frontends the pack supports (1.32 and 1.49) skip
// widgets with `hidden` set when they draw and size a node.
import { app } from "../../scripts/app.js";

const NODE = "CalibriCombine";
const INPUT = /^calibration_(\d+)$/;

function connected(node, k) {
    const slot = node.inputs?.find((input) => input.name === `calibration_${k}`);
    return slot?.link != null;
}

function showUsedWidgets(node) {
    let changed = false;
    for (const widget of node.widgets ?? []) {
        const match = /^(?:weight|prompt)_(\d+)$/.exec(widget.name);
        if (!match) continue;
        const hidden = !connected(node, match[1]);
        if (!!widget.hidden !== hidden) {
            widget.hidden = hidden;
            changed = true;
        }
    }
    if (!changed) return;
    const [width, height] = node.computeSize();
    node.setSize([Math.max(node.size[0], width), height]);
    node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "Calibri.CombineUsedWidgets",
    beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== NODE) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function (...args) {
            const result = onNodeCreated?.apply(this, args);
            showUsedWidgets(this);
            return result;
        };
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function (...args) {
            const result = onConfigure?.apply(this, args);
            showUsedWidgets(this);
            return result;
        };
        const onConnectionsChange = nodeType.prototype.onConnectionsChange;
        nodeType.prototype.onConnectionsChange = function (type, index, ...rest) {
            const result = onConnectionsChange?.apply(this, [type, index, ...rest]);
            if (INPUT.test(this.inputs?.[index]?.name ?? "")) showUsedWidgets(this);
            return result;
        };
    },
});
